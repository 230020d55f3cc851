import java.util.concurrent.CountDownLatch;
import org.codelibs.elasticsearch.runner.ElasticsearchClusterRunner;

/**
 * Runs a one-node Elasticsearch cluster (codelibs' elasticsearch-cluster-runner) until SIGTERM.
 * Usage: ElasticsearchServer BASE_DIR HOST HTTP_PORT TRANSPORT_PORT.
 * The runner's own main() cannot serve ports above 9299, hence this launcher.
 */
public final class ElasticsearchServer {
    public static void main(String[] args) throws InterruptedException {
        if (args.length != 4) {
            System.err.println("usage: ElasticsearchServer BASE_DIR HOST HTTP_PORT TRANSPORT_PORT");
            System.exit(2);
        }
        String baseDir = args[0], host = args[1], httpPort = args[2], transportPort = args[3];
        ElasticsearchClusterRunner runner = new ElasticsearchClusterRunner();
        // A negative maximum makes the runner take the configured port as it is instead of probing 9201..9299.
        runner.setMaxHttpPort(-1);
        runner.onBuild((number, settings) -> {
            settings.put("network.host", host);
            settings.put("http.port", httpPort);
            settings.put("transport.port", transportPort);
            settings.put("discovery.type", "single-node");
        });
        try {
            runner.build(new ElasticsearchClusterRunner.Configs()
                    .basePath(baseDir).numOfNode(1).clusterName("rtml").build());
        } catch (RuntimeException error) {
            // Exit instead of leaving half-started node threads running (e.g. a port already taken).
            error.printStackTrace();
            System.exit(1);
        }
        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                runner.close();
            } catch (Exception error) {
                error.printStackTrace();
            }
            stopped.countDown();
        }));
        stopped.await();
    }
}
