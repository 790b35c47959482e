from caloforge.cli import main

raise SystemExit(main())
