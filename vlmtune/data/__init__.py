"""The data side: records -> media -> conversation -> dataset -> collator."""
