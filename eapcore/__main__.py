from eapcore.cli import main

raise SystemExit(main())
