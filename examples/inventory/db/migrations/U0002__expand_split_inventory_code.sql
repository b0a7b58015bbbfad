DROP TABLE IF EXISTS inventory_code_rejects;
ALTER TABLE inventory
    DROP COLUMN IF EXISTS location_code,
    DROP COLUMN IF EXISTS batch_number,
    DROP COLUMN IF EXISTS serial_number;
