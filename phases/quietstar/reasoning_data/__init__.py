"""Phase 3's reasoning data: examples of the thinking-token structure for prompt baking, written
offline from the curriculum (``local``) or bought from frontier models on OpenRouter (``openrouter``);
``generation`` holds what both share (the plan, prompts, ledger, validation, dedup, dataset files)."""
