import sys

from structvae.cli import main

sys.exit(main())
