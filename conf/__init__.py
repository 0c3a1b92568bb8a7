"""Hydra configs, shipped inside the package as fitnets_cli.conf (Hydra finds them by module name)."""
