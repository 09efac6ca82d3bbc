import sys

from fx_sparsity.cli.command import main

sys.exit(main())
