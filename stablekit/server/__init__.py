"""`stablekit serve`: the HTTP server (FastAPI). Import `create_app` from `stablekit.server.app`;
this package's top level stays free of FastAPI so the CLI can register its options cheaply."""
