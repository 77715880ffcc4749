use super::codes::{classify_sqlstate, sqlstate_class};
use super::*;

#[test]
fn too_few_brokers_up_for_a_topic_is_a_wait_and_too_many_replicas_asked_is_fatal() {
    let refused = |replication, brokers| Error::TopicCreation {
        topic: "t".into(),
        code: RDKafkaErrorCode::InvalidReplicationFactor,
        partitions: 3,
        replication,
        brokers,
    };
    // The cluster's default while brokers are down; three of a three-broker cluster.
    assert_eq!(classify(&refused(-1, 3)), Disposition::Retry);
    assert_eq!(classify(&refused(3, 3)), Disposition::Retry);
    assert!(refused(-1, 3)
        .to_string()
        .contains("the cluster's default replication factor"));
    // More replicas than the cluster has brokers: no wait helps.
    assert_eq!(classify(&refused(7, 3)), Disposition::Fatal);
    assert!(refused(7, 3)
        .to_string()
        .contains("kafka.replication_factor"));
    let outbox = Error::SequenceBehind("next seq 2, published 5".into());
    assert_eq!(classify(&outbox), Disposition::Retry);
    assert!(outbox.to_string().contains("dualsync outbox resequence"));
}

#[test]
fn decode_and_encode_errors_dead_letter() {
    let e = Error::Decode(DecodeError::Empty);
    assert_eq!(classify(&e), Disposition::DeadLetter);
    assert_eq!(e.class(), "decode.empty");
}

#[test]
fn kafka_transport_failures_retry_and_auth_failures_stop() {
    let transient = Error::Kafka(KafkaError::MessageProduction(
        RDKafkaErrorCode::BrokerTransportFailure,
    ));
    assert_eq!(classify(&transient), Disposition::Retry);
    let auth = Error::Kafka(KafkaError::MessageProduction(
        RDKafkaErrorCode::TopicAuthorizationFailed,
    ));
    assert_eq!(classify(&auth), Disposition::Fatal);
    let big = Error::Kafka(KafkaError::MessageProduction(
        RDKafkaErrorCode::MessageSizeTooLarge,
    ));
    assert_eq!(classify(&big), Disposition::DeadLetter);
}

fn mongo_write(failure: mongodb::error::WriteFailure) -> Error {
    Error::Mongo(mongodb::error::ErrorKind::Write(failure).into())
}

/// Issue #23 items 2 and 6: per-document and write-concern errors are classified by code
/// like any other MongoDB error.
#[test]
fn mongo_write_and_write_concern_errors_are_classified_by_code() {
    use mongodb::bson::{doc, from_document};
    use mongodb::error::WriteFailure;
    let write = |code: i32| {
        mongo_write(WriteFailure::WriteError(
            from_document(doc! {"code": code, "errmsg": "x"}).unwrap(),
        ))
    };
    let concern = |code: i32| {
        mongo_write(WriteFailure::WriteConcernError(
            from_document(doc! {"code": code, "codeName": "x", "errmsg": "x"}).unwrap(),
        ))
    };
    for (code, expected) in [
        (10107, Disposition::Retry),    // NotWritablePrimary
        (112, Disposition::Retry),      // WriteConflict
        (11601, Disposition::Retry),    // Interrupted
        (121, Disposition::DeadLetter), // DocumentValidationFailure
        (MONGO_DUPLICATE_KEY, Disposition::DeadLetter),
        (13, Disposition::Fatal), // Unauthorized
    ] {
        assert_eq!(classify(&write(code)), expected, "write error {code}");
    }
    assert_eq!(classify(&concern(64)), Disposition::Retry);
    assert_eq!(classify(&concern(91)), Disposition::Retry);
    assert_eq!(classify(&concern(100)), Disposition::Fatal); // UnsatisfiableWriteConcern
}

/// Issue #35 item 8: a lock held by another session (`lock_timeout`), an object in use
/// and the other transient SQLSTATEs are retried, never fatal.
#[test]
fn postgres_lock_and_timeout_states_retry() {
    for code in [
        "55P03", "55006", "57014", "40001", "40P01", "08006", "53300", "25006", "25P03", "25P04",
        "72000", "57P01",
    ] {
        assert_eq!(classify_sqlstate(code), Disposition::Retry, "{code}");
    }
    for code in ["23514", "23502", "22P02", "22003", "54000"] {
        assert_eq!(classify_sqlstate(code), Disposition::DeadLetter, "{code}");
    }
    for code in [
        "42501", "42P01", "3D000", "28P01", "55000", "55P02", "XX000", "0A000",
    ] {
        assert_eq!(classify_sqlstate(code), Disposition::Fatal, "{code}");
    }
}

/// Issue #35 item 11: a sink's refusals get a class per cause, so `dlq replay --class`
/// can pick one.
#[test]
fn postgres_refusals_are_classed_by_sqlstate() {
    for (code, class) in [
        ("23514", "sink.check_violation"),
        ("23502", "sink.not_null_violation"),
        ("23505", "sink.unique_violation"),
        ("22P02", "sink.invalid_text_representation"),
        ("22003", "sink.numeric_value_out_of_range"),
        ("22999", "sink.data_exception"),
        ("23999", "sink.integrity_constraint_violation"),
        ("54001", "sink.program_limit_exceeded"),
        ("08006", "postgres"),
    ] {
        assert_eq!(sqlstate_class(code), class, "{code}");
    }
}

/// Issue #35 item 8: MongoDB's lock codes (and the other codes added) are retried.
#[test]
fn mongo_lock_codes_retry() {
    use mongodb::bson::{doc, from_document};
    use mongodb::error::{ErrorKind, WriteFailure};
    for code in [24, 46, 133, 134, 202, 10058, 13388] {
        let command: Error = Error::Mongo(
            ErrorKind::Command(
                from_document(doc! {"code": code, "codeName": "x", "errmsg": "x"}).unwrap(),
            )
            .into(),
        );
        assert_eq!(
            classify(&command),
            Disposition::Retry,
            "command error {code}"
        );
        let write = mongo_write(WriteFailure::WriteError(
            from_document(doc! {"code": code, "errmsg": "x"}).unwrap(),
        ));
        assert_eq!(classify(&write), Disposition::Retry, "write error {code}");
    }
}

#[test]
fn setup_problems_are_fatal() {
    for e in [
        Error::Misconfigured("x".into()),
        Error::Connect("x".into()),
        Error::Schema("x".into()),
        Error::Internal("x".into()),
    ] {
        assert_eq!(classify(&e), Disposition::Fatal, "{e}");
        assert!(hint(&e).is_some(), "{e}");
    }
}

#[test]
fn a_lost_replication_stream_is_retried_and_a_lost_slot_stops_with_its_recovery() {
    for e in [
        WalError::Io("reset".into()),
        WalError::Protocol("bad frame".into()),
        // Another session streams the slot: a standby's wait.
        WalError::Server {
            code: "55006".into(),
            message: "replication slot \"s\" is active for PID 7".into(),
        },
    ] {
        let e = Error::from(e);
        assert_eq!(classify(&e), Disposition::Retry, "{e}");
        assert_eq!(endpoint(&e, Endpoint::Source), Some(Endpoint::Source));
    }
    let lost = Error::from(WalError::SlotLost {
        slot: "s".into(),
        reason: "invalidated".into(),
    });
    assert_eq!(classify(&lost), Disposition::Fatal);
    assert_eq!(lost.class(), "source.slot_lost");
    assert!(lost.to_string().contains("dualsync snapshot"));
    let no_permission = Error::from(WalError::Server {
        code: "42501".into(),
        message: "permission denied to start WAL sender".into(),
    });
    assert_eq!(classify(&no_permission), Disposition::Fatal);
    assert!(hint(&no_permission).unwrap().contains("REPLICATION"));
    let overflow = Error::from(WalError::VersionOverflow("too many".into()));
    assert_eq!(classify(&overflow), Disposition::Fatal);
}
