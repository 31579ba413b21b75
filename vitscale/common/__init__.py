"""What every layer uses: errors, devices and dtypes, torchrun ranks, signals, locks, run-directory
rules, atomic writes (io), checkpoints, RNG state (rng), class names, figures and the typed record
codec. Imports no other vitscale package."""
