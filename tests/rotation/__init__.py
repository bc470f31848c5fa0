"""CA rotation: staged-set checks, generators, and the chain of trust checked by real clients."""
