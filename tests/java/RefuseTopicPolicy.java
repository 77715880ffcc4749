// A broker-side create-topic policy for tests/it/topic_refusals.rs: refuses every topic whose
// name contains "refused", so a test can see Kafka's PolicyViolation answer.

import java.util.Map;

import org.apache.kafka.common.errors.PolicyViolationException;
import org.apache.kafka.server.policy.CreateTopicPolicy;

public class RefuseTopicPolicy implements CreateTopicPolicy {
    @Override
    public void configure(Map<String, ?> configs) {}

    @Override
    public void validate(RequestMetadata request) throws PolicyViolationException {
        if (request.topic().contains("refused")) {
            throw new PolicyViolationException("topics named *refused* are not allowed here");
        }
    }

    @Override
    public void close() {}
}
