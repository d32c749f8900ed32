"""Text in and out: the tokenizer, incremental detokenizing, and chat templates."""
