-- Expand: add the three new columns and backfill them from inventory_code.
-- Idempotent: re-running adds nothing and backfills nothing twice.
-- Codes are normalised (embedded spaces and trailing whitespace removed) before
-- being split; a code that still does not match is rejected into
-- inventory_code_rejects with the reason, and its new columns stay NULL.
ALTER TABLE inventory
    ADD COLUMN IF NOT EXISTS location_code text,
    ADD COLUMN IF NOT EXISTS batch_number  integer,
    ADD COLUMN IF NOT EXISTS serial_number integer;

CREATE TABLE IF NOT EXISTS inventory_code_rejects (
    inventory_id bigint PRIMARY KEY REFERENCES inventory (id) ON DELETE CASCADE,
    code         text NOT NULL,
    reason       text NOT NULL
);

WITH normalised AS (
    SELECT id, regexp_replace(inventory_code, '\s+', '', 'g') AS code
    FROM inventory
    WHERE location_code IS NULL
)
UPDATE inventory i
SET location_code = substring(n.code FROM '^(W\d{2})-'),
    batch_number  = substring(n.code FROM '^W\d{2}-B(\d{4})-')::integer,
    serial_number = substring(n.code FROM '-(\d{6})$')::integer
FROM normalised n
WHERE i.id = n.id AND n.code ~ '^W\d{2}-B\d{4}-\d{6}$';

INSERT INTO inventory_code_rejects (inventory_id, code, reason)
SELECT id, inventory_code,
       CASE WHEN regexp_replace(inventory_code, '\s+', '', 'g') ~ '^W\d{2}-B\d{4}-\d{6}$' THEN 'unknown'
            ELSE 'does not match W99-B9999-999999 after removing whitespace' END
FROM inventory
WHERE location_code IS NULL
ON CONFLICT (inventory_id) DO NOTHING;
