-- Contract, one deploy cycle after the expand: readers use the new columns now.
-- Refuses to run while a row would lose its only copy of the code.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM inventory
               WHERE location_code IS NULL
                 AND id NOT IN (SELECT inventory_id FROM inventory_code_rejects)) THEN
        RAISE EXCEPTION 'unsplit inventory codes remain: run the backfill (V0002) first';
    END IF;
END $$;
ALTER TABLE inventory_code_rejects DROP CONSTRAINT IF EXISTS inventory_code_rejects_inventory_id_fkey;
ALTER TABLE inventory DROP COLUMN IF EXISTS inventory_code;
