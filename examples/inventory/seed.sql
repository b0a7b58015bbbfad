-- 10,000 inventory rows with well-formed codes (production's data).
INSERT INTO inventory (sku, quantity, inventory_code)
SELECT 'SKU-' || g, (g * 7) % 500,
       format('W%s-B%s-%s', lpad(((g % 40) + 1)::text, 2, '0'), lpad((g % 9000 + 1)::text, 4, '0'),
              lpad(g::text, 6, '0'))
FROM generate_series(1, 10000) g;
