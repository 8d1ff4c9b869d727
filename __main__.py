"""`python -m diffusion_feature ...`: the command line."""
from .nodes.cli import main

raise SystemExit(main())
