// node-postgres through the tierbase proxy, driven by tests/test_clients.py.
// argv[2]: JSON list of cases {name, config, table, cancel, caFile}; prints one JSON line per case.
'use strict'
const fs = require('fs')
const pg = require('pg')

async function run(c) {
  const config = { ...c.config, connectionTimeoutMillis: 20000 }
  if (c.caFile) config.ssl = { ...config.ssl, ca: fs.readFileSync(c.caFile, 'utf8') }
  const out = { name: c.name }
  const client = new pg.Client(config)
  // the SASL mechanism the client chose (SCRAM-SHA-256-PLUS means channel binding)
  const send = client.connection.sendSASLInitialResponseMessage.bind(client.connection)
  client.connection.sendSASLInitialResponseMessage = (mechanism, response) => {
    out.mechanism = mechanism
    send(mechanism, response)
  }
  try {
    await client.connect()
    const stream = client.connection.stream
    out.tls = typeof stream.getPeerCertificate === 'function' && stream.encrypted === true
    let r = await client.query('SELECT current_user AS role, count(*)::int AS n FROM seed')
    out.role = r.rows[0].role
    out.seed = r.rows[0].n
    await client.query('BEGIN')
    await client.query(`CREATE TABLE ${c.table} (id int PRIMARY KEY, client text NOT NULL)`)
    await client.query(`INSERT INTO ${c.table} VALUES ($1, $2)`, [1, c.name])
    await client.query('COMMIT')
    r = await client.query(`SELECT client FROM ${c.table} WHERE id = $1`, [1])
    out.wrote = r.rows[0].client
    if (c.cancel) {
      // node-postgres cancels from a second Client over plain TCP, as libpq before 17 does. The query
      // is on the wire once active, but may reach the compute after a cancel: so cancel until it ends
      // (cancel() does nothing once the query is no longer the active one).
      const started = Date.now()
      const sleep = client.query('SELECT pg_sleep(30)')
      const active = client.activeQuery
      const ticker = setInterval(() => new pg.Client({ ...c.config, ssl: false }).cancel(client, active), 300)
      try {
        await sleep
        out.cancel = 'not cancelled'
      } catch (err) {
        out.cancel = err.code
      } finally {
        clearInterval(ticker)
      }
      out.cancel_seconds = (Date.now() - started) / 1000
      r = await client.query('SELECT 1 AS one')
      out.after_cancel = r.rows[0].one
    }
  } catch (err) {
    out.error = String(err.message || err)
    out.code = err.code || null
  } finally {
    await client.end().catch(() => {})
  }
  return out
}

async function main() {
  const cases = JSON.parse(process.argv[2])
  for (const c of cases) {
    process.stdout.write(JSON.stringify(await run(c)) + '\n')
  }
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
