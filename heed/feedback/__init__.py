"""The human feedback app: people compare, rank, thumb and rate responses; heed stores and exports it.

    store.py      the database (SQLite in WAL mode, or any SQLAlchemy URL): items, annotators,
                  claims, answers; every answer committed in its own transaction
    agreement.py  Cohen's kappa, Krippendorff's alpha, agreement with a reward model
    active.py     active selection: serve the items a reward-model ensemble disagrees on first
    export.py     answers -> the JSONL formats `heed rm train` reads
    app.py        the web app (FastAPI, server-side Jinja templates, one small script)
    cli.py        `heed label serve | add | export | user add`
"""
