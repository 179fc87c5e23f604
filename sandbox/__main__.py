from sandbox.entry import main

raise SystemExit(main())
