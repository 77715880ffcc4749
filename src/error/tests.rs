use super::codes::{classify_sqlstate, sqlstate_class};
use super::*;
use crate::codec::registry::RegistryError;
use crate::codec::{DecodeError, EncodeError};

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

/// An admin request (creating a topic) whose broker connection broke is retried like any
/// other request, not fatal: rdkafka keeps an admin error's code out of
/// `rdkafka_error_code()`, and a partition of one broker during the relay's start-up stopped
/// the relay (`chaos` seed 2 with `DUALSYNC_CHAOS_TARGET="Kafka broker 2"`).
#[test]
fn admin_operations_are_classified_by_their_code() {
    let transport = Error::Kafka(KafkaError::AdminOp(
        RDKafkaErrorCode::BrokerTransportFailure,
    ));
    assert_eq!(classify(&transport), Disposition::Retry);
    let timed_out = Error::Kafka(KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut));
    assert_eq!(classify(&timed_out), Disposition::Retry);
    let denied = Error::Kafka(KafkaError::AdminOp(
        RDKafkaErrorCode::ClusterAuthorizationFailed,
    ));
    assert_eq!(classify(&denied), Disposition::Fatal);
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

/// The policy of every kind of error, once: class, disposition and whether an operator gets
/// a hint. The exhaustive match in `kind` fails to compile when a variant is added, and the
/// assertion below fails until the table has a row for it.
#[test]
fn every_variant_has_one_policy() {
    use mongodb::bson::{doc, from_document};
    use std::time::Duration;
    use Disposition::{DeadLetter, Fatal, Retry};
    fn kind(e: &Error) -> usize {
        match e {
            Error::Config(_) => 0,
            Error::Decode(_) => 1,
            Error::Encode(_) => 2,
            Error::Postgres(_) => 3,
            Error::Mongo(_) => 4,
            Error::Kafka(_) => 5,
            Error::Registry(_) => 6,
            Error::KafkaCredentials { .. } => 7,
            Error::TopicCreation { .. } => 8,
            Error::UnconfirmedDelivery { .. } => 9,
            Error::Rejected(_) => 10,
            Error::BelowPurgeHorizon { .. } => 11,
            Error::Misconfigured(_) => 12,
            Error::Connect(_) => 13,
            Error::Listen { .. } => 14,
            Error::Tls(_) => 15,
            Error::Schema(_) => 16,
            Error::Internal(_) => 17,
            Error::TaskFailed { .. } => 18,
            Error::Interrupted(_) => 19,
            Error::HistoryLost(_) => 20,
            Error::LeaseLost(_) => 21,
            Error::LeaderSilent(_) => 22,
            Error::ForeignTopic { .. } => 23,
            Error::DlqRequest(_) => 24,
            Error::SequenceBehind(_) => 25,
            Error::SinkTimeout { .. } => 26,
            Error::SchemaPending { .. } => 27,
            Error::Halted(_) => 28,
            Error::MalformedChange { .. } => 29,
            Error::Bson { .. } => 30,
            Error::Checkpoint { .. } => 31,
            Error::Wal(_) => 32,
            Error::WalSetup(_) => 33,
        }
    }
    const KINDS: usize = 34;
    let text = || "x".to_string();
    let mongo_command = Error::Mongo(
        mongodb::error::ErrorKind::Command(
            from_document(doc! {"code": 13, "codeName": "Unauthorized", "errmsg": "x"}).unwrap(),
        )
        .into(),
    );
    // A tokio-postgres error without a SQLSTATE (a connection string that does not parse):
    // the "connection broke" branch.
    let postgres = Error::Postgres(
        "port=not-a-number"
            .parse::<tokio_postgres::Config>()
            .unwrap_err(),
    );
    let cancelled = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(async {
            let task = tokio::spawn(std::future::pending::<()>());
            task.abort();
            task.await.unwrap_err()
        });
    let listen = std::io::Error::from(std::io::ErrorKind::AddrInUse);
    let table: Vec<(Error, &str, Disposition, bool)> = vec![
        (
            Error::Config(crate::config::ConfigError {
                file: "f".into(),
                key: "k".into(),
                problem: "p".into(),
            }),
            "config",
            Fatal,
            true,
        ),
        (
            Error::Decode(DecodeError::NullKey),
            "decode.null_key",
            DeadLetter,
            false,
        ),
        (
            Error::Encode(EncodeError::NoSchema("t".into())),
            "encode.no_schema",
            DeadLetter,
            false,
        ),
        (postgres, "postgres", Retry, false),
        (mongo_command, "mongodb", Fatal, true),
        (
            Error::Kafka(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge,
            )),
            "publish.too_large",
            DeadLetter,
            false,
        ),
        (
            Error::Registry(RegistryError::Unreachable {
                url: "u".into(),
                reason: "r".into(),
            }),
            "registry",
            Retry,
            false,
        ),
        (
            Error::KafkaCredentials {
                brokers: "b".into(),
                reason: "r".into(),
            },
            "kafka.credentials",
            Fatal,
            false,
        ),
        (
            Error::TopicCreation {
                topic: "t".into(),
                code: RDKafkaErrorCode::TopicAuthorizationFailed,
                partitions: 1,
                replication: 1,
                brokers: 1,
            },
            "kafka.topic_creation",
            Fatal,
            false,
        ),
        (
            Error::UnconfirmedDelivery {
                topic: "t".into(),
                partition: 0,
            },
            "kafka.unconfirmed_delivery",
            Retry,
            false,
        ),
        (Error::Rejected(text()), "sink.rejected", DeadLetter, false),
        (
            Error::BelowPurgeHorizon {
                namespace: "n".into(),
                key: "k".into(),
                version: 1,
                horizon: 2,
            },
            "sink.below_purge_horizon",
            DeadLetter,
            false,
        ),
        (Error::Misconfigured(text()), "setup.config", Fatal, true),
        (Error::Connect(text()), "setup.connect", Fatal, true),
        (
            Error::Listen {
                address: "a".into(),
                source: listen,
            },
            "setup.connect",
            Fatal,
            true,
        ),
        (
            Error::Tls(openssl::error::ErrorStack::get()),
            "setup.connect",
            Fatal,
            true,
        ),
        (Error::Schema(text()), "setup.schema", Fatal, true),
        (Error::Internal(text()), "internal", Fatal, true),
        (
            Error::TaskFailed {
                task: "t",
                source: cancelled,
            },
            "internal",
            Fatal,
            true,
        ),
        (Error::Interrupted(text()), "interrupted", Fatal, true),
        (
            Error::HistoryLost(text()),
            "source.history_lost",
            Fatal,
            false,
        ),
        (Error::LeaseLost(text()), "source.lease_lost", Retry, false),
        (
            Error::LeaderSilent(Duration::from_secs(1)),
            "source.leader_silent",
            Retry,
            false,
        ),
        (
            Error::ForeignTopic {
                topic: "t".into(),
                pipeline: "p".into(),
            },
            "dlq.foreign_topic",
            Fatal,
            false,
        ),
        (
            Error::DlqRequest(RequestError::OffsetsWithoutPartition),
            "dlq.request",
            Fatal,
            true,
        ),
        (
            Error::SequenceBehind(text()),
            "source.sequence_behind",
            Retry,
            false,
        ),
        (
            Error::SinkTimeout {
                sink: "s".into(),
                after_ms: 1,
            },
            "sink.timeout",
            Retry,
            false,
        ),
        (
            Error::SchemaPending {
                fingerprint: "f".into(),
            },
            "decode.schema_pending",
            Retry,
            false,
        ),
        (Error::Halted(text()), "halted", Fatal, false),
        (
            Error::MalformedChange {
                operation: "change",
                missing: "clusterTime",
            },
            "internal",
            Fatal,
            true,
        ),
        (
            Error::Bson {
                what: "resume token",
                source: "x".into(),
            },
            "internal",
            Fatal,
            true,
        ),
        (
            Error::Checkpoint {
                path: "c.json".into(),
                source: "x".into(),
            },
            "interrupted",
            Fatal,
            true,
        ),
        (
            Error::Wal(WalError::Protocol("x".into())),
            "source.replication",
            Retry,
            false,
        ),
        (
            Error::WalSetup(crate::error::WalSetupError::SlotMissing { slot: "s".into() }),
            "source.wal_setup",
            Fatal,
            false,
        ),
    ];
    let mut seen = [false; KINDS];
    for (e, class, disposition, hinted) in &table {
        seen[kind(e)] = true;
        let policy = e.policy();
        assert_eq!(policy.class, *class, "{e}");
        assert_eq!(policy.disposition, *disposition, "{e}");
        assert_eq!(policy.hint.is_some(), *hinted, "{e}");
        // The three views agree with the one policy.
        assert_eq!(
            (e.class(), classify(e), hint(e)),
            (policy.class, policy.disposition, policy.hint)
        );
    }
    assert!(seen.iter().all(|s| *s), "a variant without a row: {seen:?}");
    // A refused permission gets its own hint; a fatal Kafka error the broker's.
    let auth = Error::Kafka(KafkaError::MessageProduction(
        RDKafkaErrorCode::TopicAuthorizationFailed,
    ));
    assert!(hint(&auth).unwrap().contains("kafka.brokers"));
}

/// The rule "no `Result<_, String>` in `src/`": an error as bare text names neither its kind
/// nor the thing at fault, and cannot be classified. Reads every source file with syn, so
/// nested types (`Result<Vec<u8>, String>`, `OnceLock<Result<_, String>>`) count too.
#[test]
fn no_result_with_a_string_error_in_src() {
    use syn::visit::{self, Visit};
    struct Finder<'a> {
        file: &'a str,
        found: Vec<String>,
    }
    impl<'ast> Visit<'ast> for Finder<'_> {
        fn visit_type_path(&mut self, ty: &'ast syn::TypePath) {
            let last = ty.path.segments.last();
            if let Some(syn::PathSegment {
                ident,
                arguments: syn::PathArguments::AngleBracketed(args),
            }) = last
            {
                let is_string = |a: &syn::GenericArgument| matches!(a, syn::GenericArgument::Type(syn::Type::Path(p)) if p.path.is_ident("String"));
                if ident == "Result" && args.args.iter().nth(1).is_some_and(is_string) {
                    let line = ident.span().start().line;
                    self.found.push(format!("{}:{line}", self.file));
                }
            }
            visit::visit_type_path(self, ty);
        }
    }
    let mut found = Vec::new();
    let mut dirs = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src"
    ))];
    let mut files = 0;
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files += 1;
                let text = std::fs::read_to_string(&path).unwrap();
                let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
                let name = path.display().to_string();
                let mut finder = Finder {
                    file: &name,
                    found: Vec::new(),
                };
                finder.visit_file(&file);
                found.extend(finder.found);
            }
        }
    }
    assert!(files > 50, "read only {files} files");
    assert!(
        found.is_empty(),
        "Result<_, String> in src/ (give the error a type: a variant in src/error or a local \
         thiserror enum naming the thing at fault): {found:#?}"
    );
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
