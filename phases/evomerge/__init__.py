"""Phase 2 EvoMerge: six merge techniques, recipes as candidates, a genetic algorithm over them."""
