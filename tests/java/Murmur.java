// Kafka's own default partitioning of a keyed record (kafka-clients' BuiltInPartitioner):
// toPositive(murmur2(key bytes)) % partitions. Reads "<partitions>" then one key per line on
// stdin, prints "<key> <partition>" per key. Run: java -cp "$KAFKA_LIBS/*" Murmur.java
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import org.apache.kafka.common.utils.Utils;

public class Murmur {
    public static void main(String[] args) throws Exception {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        int partitions = Integer.parseInt(in.readLine().trim());
        StringBuilder out = new StringBuilder();
        for (String key; (key = in.readLine()) != null; ) {
            byte[] bytes = key.getBytes(StandardCharsets.UTF_8);
            out.append(key).append(' ').append(Utils.toPositive(Utils.murmur2(bytes)) % partitions).append('\n');
        }
        System.out.print(out);
    }
}
