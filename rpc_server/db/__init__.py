"""The database: statements compiled once by SQLAlchemy, run on the drivers' own pools
(``engines``, ``sqlite``, ``postgres``), units of work, repositories by aggregate, and
the schema's migrations (Alembic, on a stock engine: ``migrate``, ``stock_engine``)."""
