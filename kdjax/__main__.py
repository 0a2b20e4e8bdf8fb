from kdjax.cli import main

raise SystemExit(main())
