from metatransfer.cli import main

raise SystemExit(main())
