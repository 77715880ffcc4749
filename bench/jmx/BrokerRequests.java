import com.sun.tools.attach.VirtualMachine;
import java.util.Map;
import java.util.TreeMap;
import javax.management.MBeanServerConnection;
import javax.management.ObjectName;
import javax.management.remote.JMXConnector;
import javax.management.remote.JMXConnectorFactory;
import javax.management.remote.JMXServiceURL;

/**
 * The broker's request counts so far, by request type, as one JSON object on stdout
 * ({"Produce": 1234, "Fetch": 567, ...}): kafka.network RequestMetrics RequestsPerSec's Count,
 * summed over versions. `make bench` takes one before and one after each phase.
 *
 * usage: java -cp DIR BrokerRequests BROKER_PID
 * Attaches to the broker's JVM (same user) and starts its local management agent if needed.
 */
public final class BrokerRequests {
    public static void main(String[] args) {
        try {
            print(args[0]);
        } catch (Exception e) {
            // One line for the bench's warning: the reason, not a stack trace.
            System.err.println("broker pid " + args[0] + ": " + e);
            System.exit(1);
        }
    }

    private static void print(String pid) throws Exception {
        VirtualMachine vm = VirtualMachine.attach(pid);
        try (JMXConnector jmx = JMXConnectorFactory.connect(new JMXServiceURL(vm.startLocalManagementAgent()))) {
            MBeanServerConnection server = jmx.getMBeanServerConnection();
            Map<String, Long> counts = new TreeMap<>();
            ObjectName pattern = new ObjectName("kafka.network:type=RequestMetrics,name=RequestsPerSec,*");
            for (ObjectName name : server.queryNames(pattern, null)) {
                long count = ((Number) server.getAttribute(name, "Count")).longValue();
                counts.merge(name.getKeyProperty("request"), count, Long::sum);
            }
            StringBuilder json = new StringBuilder("{");
            counts.forEach((request, count) -> json.append(json.length() > 1 ? ", " : "")
                    .append('"').append(request).append("\": ").append(count));
            System.out.println(json.append('}'));
        } finally {
            vm.detach();
        }
    }
}
