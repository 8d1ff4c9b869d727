"""`python -m diffusion_feature ...`: the command line."""
from .engine.cli import main

raise SystemExit(main())
