-- API tokens of the compliance/administration API. Only the SHA-256 of a
-- token is stored; the token itself is shown once, when it is created.
CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,        -- UUIDv7
    name        TEXT NOT NULL UNIQUE,    -- who holds it (operator's label)
    role        TEXT NOT NULL,           -- compliance-officer | administrator
    secret_hash TEXT NOT NULL UNIQUE,    -- hex SHA-256 of the whole token
    created_us  INTEGER NOT NULL,
    revoked_us  INTEGER                  -- set when revoked; never unset
);
