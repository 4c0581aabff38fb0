"""Exchange with other implementations (EvolutionaryScale's `esm`), by tensors only."""
