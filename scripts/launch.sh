# Shared launcher of the finetune*.sh scripts: sourced, not run.
#
# A script sources this file first, then sets its knobs (each one only if unset, so the environment
# overrides it), then calls `launch ARGS...`; VLMTUNE_COMMAND (set by the script: train, dpo or grpo, default
# train) is the vlmtune command launched. With no MODEL_NAME, the demo values below are preset for the
# embedded tiny model, which trains on data_examples/ on CPU in about a minute.
#
# Devices: NUM_DEVICES per node (default: the visible GPUs, or 1), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
# RESUME=auto continues from the newest complete checkpoint in OUTPUT_DIR when there is one (the same command
# for the first start and every restart of a preempted job); RESUME=last insists on one.
# Several devices or nodes, or DEEPSPEED set, launch through torchrun; HOSTFILE launches through `deepspeed`.
# ENGINE=fsdp2 trains with PyTorch FSDP2 (the Trainer's --fsdp full_shard --fsdp_config FSDP_CONFIG, default
# scripts/fsdp2.json) instead of DeepSpeed: DEEPSPEED is then ignored.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=${PYTHON:-$ROOT/.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi

HAS_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
on_cuda() { if [ "$HAS_CUDA" = 1 ]; then echo "$1"; fi; }  # a default that applies on GPUs only
if [ -z "${MODEL_NAME:-}" ]; then
    # Demo values for the tiny model: it starts from random weights, so it needs many epochs at a high rate.
    : "${EPOCHS:=20}" "${LR:=1e-2}" "${GLOBAL_BATCH_SIZE:=4}" "${BATCH_PER_DEVICE:=4}" "${LORA_RANK:=16}"
    : "${LORA_ALPHA:=32}" "${DATA_PATH:=data_examples/data.json}" "${IMAGE_FOLDER:=data_examples}"
    : "${MAX_SEQ_LENGTH:=1024}" "${SAVE_STEPS:=30}" "${LOGGING_STEPS:=1}"
fi

launch() {
    local command=${VLMTUNE_COMMAND:-train}
    local nproc=${NUM_DEVICES:-}
    if [ -z "$nproc" ]; then
        nproc=$([ "$HAS_CUDA" = 1 ] && "$PYTHON" -c "import torch; print(torch.cuda.device_count())" || echo 1)
    fi
    local nnodes=${NNODES:-1}
    local world=$((nproc * nnodes))
    if [ -n "${HOSTFILE:-}" ]; then  # DeepSpeed's format: "host slots=N" per line, '#' comments
        [ -f "$HOSTFILE" ] || { echo "[launch] HOSTFILE $HOSTFILE does not exist" >&2; exit 1; }
        read -r nnodes world < <(awk '$1 !~ /^#/ && match($0, /slots=[0-9]+/) {
            n++; w += substr($0, RSTART + 6, RLENGTH - 6) } END { print n + 0, w + 0 }' "$HOSTFILE")
        [ "$world" -gt 0 ] || { echo "[launch] HOSTFILE $HOSTFILE has no 'host slots=N' line" >&2; exit 1; }
    fi
    local accum=$((GLOBAL_BATCH_SIZE / (BATCH_PER_DEVICE * world)))
    [ "$accum" -ge 1 ] || accum=1
    if [ $((accum * BATCH_PER_DEVICE * world)) -ne "$GLOBAL_BATCH_SIZE" ]; then
        echo "[launch] note: GLOBAL_BATCH_SIZE $GLOBAL_BATCH_SIZE is not BATCH_PER_DEVICE $BATCH_PER_DEVICE x $world" \
             "device(s) x a whole number of accumulation steps; the global batch is $((accum * BATCH_PER_DEVICE * world))"
    fi

    # Workers decode media ahead of the GPU (each item's media once); on CPU they would compete with training.
    local workers=$([ "$HAS_CUDA" = 1 ] && echo 4 || echo 1)
    local engine=()
    case "${ENGINE:-deepspeed}" in
        deepspeed) ;;
        fsdp2) DEEPSPEED=""; engine=(--fsdp full_shard --fsdp_config "${FSDP_CONFIG:-scripts/fsdp2.json}") ;;
        *) echo "[launch] ENGINE must be deepspeed or fsdp2, got ${ENGINE}" >&2; exit 1 ;;
    esac
    local precision=()
    if [ "$HAS_CUDA" = 1 ]; then
        precision=(--bf16 True)
        echo "[launch] device: ${world} CUDA device(s) on ${nnodes} node(s), bf16"
    else
        precision=(--use_cpu True)
        echo "[launch] device: CPU (no CUDA found): fp32, DeepSpeed" \
             "$([ -n "${DEEPSPEED:-}" ] && echo "on through gloo ($DEEPSPEED)" || echo off)"
    fi
    if [ ${#engine[@]} -gt 0 ]; then
        echo "[launch] engine: FSDP2 (${FSDP_CONFIG:-scripts/fsdp2.json})"
    fi

    local args=(
        --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" --output_dir "$OUTPUT_DIR"
        --num_train_epochs "$EPOCHS" --learning_rate "$LR"
        --per_device_train_batch_size "$BATCH_PER_DEVICE" --gradient_accumulation_steps "$accum"
        --max_seq_length "$MAX_SEQ_LENGTH" --save_steps "$SAVE_STEPS" --logging_steps "$LOGGING_STEPS"
        --report_to "${REPORT_TO:-none}" --weight_decay 0.0 --warmup_steps 0.03 --lr_scheduler_type cosine
        --dataloader_num_workers "${NUM_WORKERS:-$workers}" --save_total_limit 2
        "${precision[@]}" "${engine[@]}"
    )
    if [ "${NUM_WORKERS:-$workers}" -gt 0 ]; then  # torch refuses these options without worker processes
        args+=(--dataloader_persistent_workers True --dataloader_prefetch_factor 2)
    fi
    local knob flag
    for knob in MODEL_NAME:model_name_or_path VIDEO_FOLDER:video_folder DEEPSPEED:deepspeed \
                IMAGE_MIN_PIXELS:image_min_pixels IMAGE_MAX_PIXELS:image_max_pixels \
                VIDEO_MAX_PIXELS:video_max_pixels FPS:fps RESUME:resume_from_checkpoint; do
        flag=${knob#*:}; knob=${knob%%:*}
        if [ -n "${!knob:-}" ]; then args+=("--$flag" "${!knob}"); fi
    done
    if [ "${GRADIENT_CHECKPOINTING:-1}" = 1 ]; then args+=(--gradient_checkpointing True); fi

    if [ -n "${HOSTFILE:-}" ]; then
        exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" \
            --module vlmtune.cli "$command" "${args[@]}" "$@"
    elif [ "$world" -gt 1 ] || [ -n "${DEEPSPEED:-}" ] || [ ${#engine[@]} -gt 0 ]; then
        exec "$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --nproc_per_node "$nproc" \
            --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
            --master_port "${MASTER_PORT:-29500}" -m vlmtune.cli "$command" "${args[@]}" "$@"
    else
        exec "$PYTHON" -m vlmtune.cli "$command" "${args[@]}" "$@"
    fi
}
