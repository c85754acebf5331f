"""C{python -m zwrm.pki}: see L{zwrm.pki.main}."""

from zwrm.pki.main import main

raise SystemExit(main())
