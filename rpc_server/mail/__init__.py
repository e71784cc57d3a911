"""Receipt emails: built from fulfilled purchases, delivered from the outbox over SMTP
(or to files)."""
