import java.nio.file.Path;
import java.util.concurrent.CountDownLatch;
import org.neo4j.configuration.GraphDatabaseSettings;
import org.neo4j.configuration.connectors.BoltConnector;
import org.neo4j.configuration.helpers.SocketAddress;
import org.neo4j.dbms.api.DatabaseManagementService;
import org.neo4j.dbms.api.DatabaseManagementServiceBuilder;

/**
 * Runs a Neo4j DBMS (the org.neo4j:neo4j artifacts) with Bolt on the given address until SIGTERM.
 * Usage: Neo4jServer HOME_DIR HOST BOLT_PORT. Authentication is off: it listens on loopback for tests.
 */
public final class Neo4jServer {
    private static final long PAGE_CACHE_BYTES = 64L * 1024 * 1024;

    public static void main(String[] args) throws InterruptedException {
        if (args.length != 3) {
            System.err.println("usage: Neo4jServer HOME_DIR HOST BOLT_PORT");
            System.exit(2);
        }
        final DatabaseManagementService dbms;
        try {
            dbms = new DatabaseManagementServiceBuilder(Path.of(args[0]))
                    .setConfig(BoltConnector.enabled, true)
                    .setConfig(BoltConnector.listen_address, new SocketAddress(args[1], Integer.parseInt(args[2])))
                    .setConfig(GraphDatabaseSettings.auth_enabled, false)
                    .setConfig(GraphDatabaseSettings.pagecache_memory, PAGE_CACHE_BYTES)
                    .build();
        } catch (RuntimeException error) {
            // Exit instead of leaving half-started DBMS threads running (e.g. the Bolt port already taken).
            error.printStackTrace();
            System.exit(1);
            return;
        }
        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            dbms.shutdown();
            stopped.countDown();
        }));
        System.out.println("Neo4j is serving Bolt on " + args[1] + ":" + args[2] + "; logs in " + args[0] + "/logs");
        stopped.await();
    }
}
