import sys

from efficient_attn.cli import main

sys.exit(main())
