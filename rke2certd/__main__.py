from rke2certd.cli import main

raise SystemExit(main())
