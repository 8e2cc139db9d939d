"""Training stages: each a top-to-bottom recipe over the same data, model and run-folder parts.

``sft``, ``dpo`` and ``grpo`` are the stages. What they share: ``trainer`` (``VisionLanguageTrainer``), ``setup``
(the checks, where a run starts, its datasets, the model to train), ``fit`` (the output lock, train to summary) and
``saving`` (failed-write errors). The policy stages (DPO, GRPO, and new ones of their shape) build on ``policy``
(``PolicyTrainer``, ``PolicyStage``, ``run_policy_stage``) and ``reference`` (their reference policy).
"""
