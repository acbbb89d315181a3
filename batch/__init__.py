"""sdbatch: batch Stable Diffusion generation and evaluation on Ray (the library behind the `sdbatch` command)."""
