"""fitnets: FitNets (Romero et al., ICLR 2015) knowledge distillation with hints, as a command-line tool."""

__version__ = "0.1.0"
