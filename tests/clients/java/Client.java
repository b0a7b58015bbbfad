// pgjdbc through the tierbase proxy, driven by tests/test_clients.py; run as a single-file source:
//   java -cp /usr/share/java/postgresql.jar Client.java
// stdin: one case a line, tab-separated: name, JDBC URL, user, password, table, cancel (1/0).
// stdout: one JSON object a line per case.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicBoolean;

public class Client {
    static String json(Map<String, Object> m) {
        StringBuilder sb = new StringBuilder("{");
        for (Map.Entry<String, Object> e : m.entrySet()) {
            if (sb.length() > 1) sb.append(",");
            sb.append(quote(e.getKey())).append(":");
            Object v = e.getValue();
            if (v == null) sb.append("null");
            else if (v instanceof Number || v instanceof Boolean) sb.append(v);
            else sb.append(quote(v.toString()));
        }
        return sb.append("}").toString();
    }

    static String quote(String s) {
        StringBuilder sb = new StringBuilder("\"");
        for (char ch : s.toCharArray()) {
            if (ch == '"' || ch == '\\') sb.append('\\').append(ch);
            else if (ch < 0x20) sb.append(String.format("\\u%04x", (int) ch));
            else sb.append(ch);
        }
        return sb.append("\"").toString();
    }

    static Map<String, Object> run(String name, String url, String user, String password, String table,
                                   boolean cancel) {
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("name", name);
        Properties props = new Properties();
        props.setProperty("user", user);
        props.setProperty("password", password);
        props.setProperty("connectTimeout", "20");
        try (Connection conn = DriverManager.getConnection(url, props)) {
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery("SELECT current_user, count(*) FROM seed")) {
                rs.next();
                out.put("role", rs.getString(1));
                out.put("seed", rs.getInt(2));
            }
            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement()) {
                st.execute("CREATE TABLE " + table + " (id int PRIMARY KEY, client text NOT NULL)");
            }
            try (PreparedStatement ps = conn.prepareStatement("INSERT INTO " + table + " VALUES (?, ?)")) {
                ps.setInt(1, 1);
                ps.setString(2, name);
                ps.executeUpdate();
            }
            conn.commit();
            conn.setAutoCommit(true);
            try (PreparedStatement ps = conn.prepareStatement("SELECT client FROM " + table + " WHERE id = ?")) {
                ps.setInt(1, 1);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    out.put("wrote", rs.getString(1));
                }
            }
            if (cancel) {
                // Statement.cancel() from another thread: pgjdbc sends a CancelRequest on a new connection.
                // A cancel may reach the compute before the query does, so cancel until the query ends
                // (pgjdbc's cancel() does nothing while the statement is not executing).
                Statement st = conn.createStatement();
                AtomicBoolean finished = new AtomicBoolean(false);
                Thread canceller = new Thread(() -> {
                    try {
                        while (!finished.get()) {
                            Thread.sleep(300);
                            if (!finished.get()) st.cancel();
                        }
                    } catch (Exception e) {
                        // the assertion on the outcome reports it
                    }
                });
                long started = System.nanoTime();
                canceller.start();
                try {
                    st.execute("SELECT pg_sleep(30)");
                    out.put("cancel", "not cancelled");
                } catch (SQLException e) {
                    out.put("cancel", e.getSQLState());
                } finally {
                    finished.set(true);
                }
                out.put("cancel_seconds", (System.nanoTime() - started) / 1e9);
                canceller.join();
                st.close();
                try (Statement st2 = conn.createStatement(); ResultSet rs = st2.executeQuery("SELECT 1")) {
                    rs.next();
                    out.put("after_cancel", rs.getInt(1));
                }
            }
        } catch (Exception e) {
            out.put("error", String.valueOf(e.getMessage()));
            out.put("code", e instanceof SQLException ? ((SQLException) e).getSQLState() : null);
        }
        return out;
    }

    public static void main(String[] args) throws Exception {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, "UTF-8"));
        String line;
        while ((line = in.readLine()) != null) {
            if (line.isEmpty()) continue;
            String[] f = line.split("\t", -1);
            System.out.println(json(run(f[0], f[1], f[2], f[3], f[4], f[5].equals("1"))));
            System.out.flush();
        }
    }
}
