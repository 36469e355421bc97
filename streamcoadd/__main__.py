from streamcoadd.cli.main import main

raise SystemExit(main())
