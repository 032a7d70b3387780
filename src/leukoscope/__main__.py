from leukoscope.cli.main import main

raise SystemExit(main())
