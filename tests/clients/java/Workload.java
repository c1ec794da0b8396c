// pgjdbc workload for the client compatibility matrix (tests/client_matrix.rs).
//
// Connects with PGHOST/PGPORT/PGUSER/PGDATABASE and pgjdbc's default settings: a
// PreparedStatement runs as an unnamed statement for its first four executions and as a
// server-side named statement (S_1, S_2, ...) from the fifth on (prepareThreshold=5).
// Prints one JSON line per check; exits 1 if any check failed.

import java.io.ByteArrayOutputStream;
import java.io.StringReader;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.Callable;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class Workload {
    static final String CLIENT = "pgjdbc";
    static final String MODE = System.getenv("POOL_MODE");
    static final String TABLE = System.getenv("CLIENT_TABLE");
    static final int CONNS = Integer.parseInt(envOr("CLIENT_CONNS", "4"));
    static final int REPEAT = 12;
    static boolean failed = false;

    static String envOr(String k, String d) {
        String v = System.getenv(k);
        return v == null || v.isEmpty() ? d : v;
    }

    static String json(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\t': b.append("\\t"); break;
                default:
                    if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
                    else b.append(c);
            }
        }
        return b.append('"').toString();
    }

    static synchronized void report(String check, boolean ok, String detail) {
        failed |= !ok;
        System.out.println("{\"client\":" + json(CLIENT) + ",\"check\":" + json(check)
                + ",\"ok\":" + ok + ",\"detail\":" + json(detail) + "}");
        System.out.flush();
    }

    static Connection connect() throws SQLException {
        String url = "jdbc:postgresql://" + envOr("PGHOST", "127.0.0.1") + ":" + envOr("PGPORT", "5432")
                + "/" + envOr("PGDATABASE", "postgres");
        Properties p = new Properties();
        p.setProperty("user", envOr("PGUSER", "postgres"));
        p.setProperty("connectTimeout", "10");
        return DriverManager.getConnection(url, p);
    }

    static long countRows(Connection c, int lo, int hi) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement("SELECT count(*) FROM " + TABLE + " WHERE id BETWEEN ? AND ?")) {
            ps.setInt(1, lo);
            ps.setInt(2, hi);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                return rs.getLong(1);
            }
        }
    }

    static void prepared(List<Connection> conns) throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(conns.size());
        List<Future<Set<Integer>>> futures = new ArrayList<>();
        for (int k = 0; k < conns.size(); k++) {
            final int kk = k;
            final Connection c = conns.get(k);
            Callable<Set<Integer>> job = () -> {
                Set<Integer> pids = new HashSet<>();
                try (PreparedStatement ps = c.prepareStatement("SELECT ?::int * 2, pg_backend_pid()")) {
                    for (int i = 0; i < REPEAT; i++) {
                        int n = kk * 1000 + i;
                        ps.setInt(1, n);
                        try (ResultSet rs = ps.executeQuery()) {
                            rs.next();
                            if (rs.getInt(1) != n * 2) {
                                throw new AssertionError("connection " + kk + " run " + i + ": got " + rs.getInt(1));
                            }
                            pids.add(rs.getInt(2));
                        }
                        Thread.sleep(2);
                    }
                }
                return pids;
            };
            futures.add(pool.submit(job));
        }
        List<Set<Integer>> perConn = new ArrayList<>();
        for (Future<Set<Integer>> f : futures) {
            perConn.add(f.get(60, TimeUnit.SECONDS));
        }
        pool.shutdown();
        report("prepared", true, conns.size() + " connections x " + REPEAT
                + " executions (named from the 5th), values checked");
        List<Integer> counts = new ArrayList<>();
        Set<Integer> all = new HashSet<>();
        for (Set<Integer> s : perConn) {
            counts.add(s.size());
            all.addAll(s);
        }
        if ("transaction".equals(MODE)) {
            int max = 0;
            for (int n : counts) max = Math.max(max, n);
            report("placement", max >= 2, "server backends seen per client connection: " + counts);
        } else {
            boolean ok = all.size() == perConn.size();
            for (int n : counts) ok &= n == 1;
            report("placement", ok, "backends per connection " + counts + ", " + all.size() + " distinct");
        }
    }

    static void rollback(Connection c, Connection other) throws SQLException {
        c.setAutoCommit(false);
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + TABLE + " (id, note) VALUES (?, ?)")) {
            ps.setInt(1, 1);
            ps.setString(2, "rolled back");
            ps.executeUpdate();
        }
        c.rollback();
        c.setAutoCommit(true);
        long n = countRows(other, 1, 1);
        report("rollback", n == 0, "rows after ROLLBACK: " + n);
    }

    static String codeOf(Connection c, String sql) {
        try (Statement s = c.createStatement()) {
            s.execute(sql);
            return "none";
        } catch (SQLException e) {
            return e.getSQLState();
        }
    }

    static void errorInTx(Connection c, Connection other) throws SQLException {
        c.setAutoCommit(false);
        try (Statement s = c.createStatement()) {
            s.executeUpdate("INSERT INTO " + TABLE + " (id, note) VALUES (2, 'doomed')");
        }
        String first = codeOf(c, "SELECT 1 / 0");
        String second = codeOf(c, "SELECT 1");
        c.rollback();
        c.setAutoCommit(true);
        boolean usable;
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT 41 + 1")) {
            rs.next();
            usable = rs.getInt(1) == 42;
        }
        long n = countRows(other, 2, 2);
        boolean ok = "22012".equals(first) && "25P02".equals(second) && usable && n == 0;
        report("error_in_tx", ok, first + " then " + second + ", ROLLBACK, usable=" + usable + ", rows=" + n);
    }

    static void copy(Connection c) throws Exception {
        StringBuilder in = new StringBuilder();
        for (int i = 0; i < 200; i++) {
            in.append(100 + i).append("\tline ").append(i).append('\n');
        }
        CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
        long loaded = cm.copyIn("COPY " + TABLE + " (id, note) FROM STDIN", new StringReader(in.toString()));
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        cm.copyOut("COPY (SELECT id, note FROM " + TABLE + " WHERE id >= 100 ORDER BY id) TO STDOUT", out);
        String got = out.toString(StandardCharsets.UTF_8);
        report("copy", loaded == 200 && got.equals(in.toString()),
                loaded + " rows in, " + got.split("\n").length + " lines out (CopyManager)");
    }

    static void cancel(Connection c, Connection watcher) throws Exception {
        String marker = "cancel_" + TABLE;
        Statement s = c.createStatement();
        ExecutorService ex = Executors.newSingleThreadExecutor();
        Future<String> run = ex.submit(() -> {
            try {
                s.execute("SELECT pg_sleep(20) /* " + marker + " */");
                return "finished";
            } catch (SQLException e) {
                return e.getSQLState();
            }
        });
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
        while (true) {
            try (PreparedStatement ps = watcher.prepareStatement(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                            + "AND pid <> pg_backend_pid() AND strpos(query, ?) > 0")) {
                ps.setString(1, marker);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    if (rs.getLong(1) > 0) break;
                }
            }
            if (System.nanoTime() > deadline) {
                report("cancel", false, "the sleep never started");
                ex.shutdownNow();
                return;
            }
            Thread.sleep(50);
        }
        long start = System.nanoTime();
        s.cancel();
        String code = run.get(15, TimeUnit.SECONDS);
        double took = (System.nanoTime() - start) / 1e9;
        ex.shutdown();
        s.close();
        boolean usable;
        try (Statement t = c.createStatement(); ResultSet rs = t.executeQuery("SELECT 'alive'")) {
            rs.next();
            usable = "alive".equals(rs.getString(1));
        }
        report("cancel", "57014".equals(code) && usable,
                "SQLSTATE " + code + " after " + String.format("%.3f", took) + "s, usable=" + usable);
    }

    interface Check {
        void run() throws Exception;
    }

    public static void main(String[] args) throws Exception {
        List<Connection> conns = new ArrayList<>();
        for (int i = 0; i < CONNS; i++) {
            conns.add(connect());
        }
        String version = conns.get(0).getMetaData().getDriverVersion();
        report("connect", true, CONNS + " connections, pgjdbc " + version);
        try (Statement s = conns.get(0).createStatement()) {
            s.execute("CREATE TABLE " + TABLE + " (id int PRIMARY KEY, note text)");
        }
        Connection tx = connect();
        String[] names = {"prepared", "rollback", "error_in_tx", "copy", "cancel"};
        Check[] checks = {
            () -> prepared(conns),
            () -> rollback(tx, conns.get(1)),
            () -> errorInTx(tx, conns.get(1)),
            () -> copy(conns.get(2)),
            () -> cancel(conns.get(3), conns.get(0)),
        };
        for (int i = 0; i < checks.length; i++) {
            try {
                checks[i].run();
            } catch (Throwable e) {
                String state = e instanceof SQLException ? ((SQLException) e).getSQLState() + " " : "";
                report(names[i], false, state + e.getClass().getSimpleName() + ": " + e.getMessage());
            }
        }
        try (Statement s = conns.get(0).createStatement()) {
            s.execute("DROP TABLE " + TABLE);
        }
        for (Connection c : conns) c.close();
        tx.close();
        System.exit(failed ? 1 : 0);
    }
}
