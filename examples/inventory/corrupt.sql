-- Destructive test data: corrupt about 1% of the codes the way real data rots:
-- a missing digit, an embedded space, trailing whitespace.
UPDATE inventory SET inventory_code = CASE id % 3
        WHEN 0 THEN left(inventory_code, length(inventory_code) - 1)            -- missing digit
        WHEN 1 THEN overlay(inventory_code PLACING ' ' FROM 4 FOR 0)            -- embedded space
        ELSE inventory_code || '   '                                             -- trailing whitespace
    END
WHERE id % 100 = 0;
