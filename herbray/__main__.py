from herbray.cli import main

raise SystemExit(main())
