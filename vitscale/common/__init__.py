"""What every layer uses: errors, devices and dtypes, torchrun ranks, signals, locks, run-directory
rules, atomic writes (io), checkpoints, RNG state (rng), class names, figures and the typed record
codec (records), and every third-party private in one place (compat). Imports no other vitscale
package."""
