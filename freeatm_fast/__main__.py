from freeatm_fast.cli import main

raise SystemExit(main())
