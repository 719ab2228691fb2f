//! Reading the committed fixtures of each dataset format, good and bad.

use std::path::{Path, PathBuf};

use elder::data::{
    read_edits, read_edits_lenient, write_edits_jsonl, DataFormat, EditRecord, LocalityProbe,
    RecordLocation,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name)
}

fn error_text(path: &Path, format: DataFormat) -> String {
    format!("{:#}", read_edits(path, format).unwrap_err())
}

#[test]
fn project_jsonl_reads_all_fields_and_defaults() {
    let records = read_edits(&fixture("edits.jsonl"), DataFormat::Auto).unwrap();
    assert_eq!(records.len(), 3, "the blank line is skipped");
    let first = &records[0];
    assert_eq!(first.id, "e1");
    assert_eq!(first.knowledge_id, "capital/FR");
    assert_eq!(first.prompt, "The capital of France is");
    assert_eq!(first.target_new, "Rome");
    assert_eq!(first.target_true.as_deref(), Some("Paris"));
    assert_eq!(first.subject.as_deref(), Some("France"));
    assert_eq!(first.rephrases.len(), 2);
    assert_eq!(
        first.locality[1],
        LocalityProbe {
            prompt: "Lyon is a city in".into(),
            answer: "France".into(),
            kind: None
        }
    );
    assert_eq!(records[1].knowledge_id, "e2", "knowledge_id defaults to id");
    assert_eq!(records[1].target_true, None);
    assert_eq!(records[2].id, "3", "integer ids are accepted as strings");
    assert_eq!(records[2].target_true, None, "null counts as absent");
    assert!(records[2].rephrases.is_empty() && records[2].locality.is_empty());
}

#[test]
fn jsonl_errors_name_file_line_and_field() {
    let path = fixture("bad_edits.jsonl");
    let text = error_text(&path, DataFormat::Jsonl);
    assert!(text.contains("bad_edits.jsonl"), "{text}");
    assert!(
        text.contains("line 2: field \"target_new\": expected a string, found number"),
        "{text}"
    );
    assert!(text.contains("and 3 more"), "{text}");
}

#[test]
fn lenient_jsonl_keeps_good_records_and_lists_bad_ones() {
    let read = read_edits_lenient(&fixture("bad_edits.jsonl"), DataFormat::Auto).unwrap();
    let ids: Vec<&str> = read.records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["ok1", "ok2", "ok3"]);
    let errors: Vec<String> = read.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert_eq!(read.errors[0].location, RecordLocation::Line(2));
    assert!(errors[1].starts_with("line 4: invalid JSON"), "{errors:#?}");
    assert_eq!(
        errors[2], "line 5: duplicate id \"ok1\" (first at line 1)",
        "duplicates name both lines"
    );
    assert_eq!(errors[3], "line 7: field \"locality[0].answer\": missing");
}

#[test]
fn zsre_maps_fields_like_the_rome_lineage() {
    let path = fixture("zsre.json");
    let records = read_edits(&path, DataFormat::Auto).unwrap();
    assert_eq!(records.len(), 3);
    let first = &records[0];
    assert_eq!(first.id, "0", "id is the index when case_id is absent");
    assert_eq!(first.knowledge_id, "0");
    assert_eq!(first.prompt, "What university did Watts Humphrey attend?");
    assert_eq!(first.target_new, "University of Michigan");
    assert_eq!(
        first.target_true.as_deref(),
        Some("Illinois Institute of Technology")
    );
    assert_eq!(first.subject.as_deref(), Some("Watts Humphrey"));
    assert_eq!(
        first.rephrases,
        ["What university did Watts Humphrey take part in?"]
    );
    assert_eq!(
        first.locality,
        [LocalityProbe {
            prompt: "nq question: who played desmond doss father in hacksaw ridge?".into(),
            answer: "Hugo Weaving".into(),
            kind: Some("nq".into())
        }]
    );
    assert_eq!(
        records[1].locality[0].prompt, "nq question: types of skiing in the winter olympics 2018?",
        "an existing question mark is not doubled"
    );
    assert_eq!(records[1].target_true.as_deref(), Some("Lecanorales"));
    assert_eq!(records[2].id, "z-77");
    assert!(records[2].rephrases.is_empty() && records[2].locality.is_empty());
    // Explicit format gives the same result as detection.
    assert_eq!(read_edits(&path, DataFormat::Zsre).unwrap(), records);
}

#[test]
fn zsre_errors_name_record_index_and_field() {
    let read = read_edits_lenient(&fixture("bad_zsre.json"), DataFormat::Auto).unwrap();
    assert_eq!(read.format, DataFormat::Zsre);
    assert_eq!(read.records.len(), 1);
    let errors: Vec<String> = read.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        errors,
        [
            "record 1: field \"alt\": expected a string, found array",
            "record 2: field \"loc_ans\": missing",
        ]
    );
}

#[test]
fn counterfact_fills_subject_and_uses_true_target_for_neighbours() {
    let records = read_edits(&fixture("counterfact.json"), DataFormat::Auto).unwrap();
    assert_eq!(records.len(), 2);
    let first = &records[0];
    assert_eq!(first.id, "0");
    assert_eq!(first.prompt, "The mother tongue of Danielle Darrieux is");
    assert_eq!(first.target_new, "English");
    assert_eq!(first.target_true.as_deref(), Some("French"));
    assert_eq!(first.subject.as_deref(), Some("Danielle Darrieux"));
    assert_eq!(first.rephrases.len(), 2);
    assert_eq!(first.locality.len(), 2);
    assert!(first.locality.iter().all(|p| p.answer == "French"));
    assert_eq!(
        first.locality[0].prompt,
        "The mother tongue of L\u{e9}on Blum is"
    );
    assert_eq!(
        records[1].prompt,
        "Danielle Island is located in the continent of"
    );
    assert_eq!(
        records[1].locality,
        [LocalityProbe {
            prompt: "Brabant Island is located in".into(),
            answer: "Antarctica".into(),
            kind: Some("same_relation".into())
        }]
    );
}

#[test]
fn counterfact_errors_name_nested_fields_and_duplicates() {
    let path = fixture("bad_counterfact.json");
    let text = error_text(&path, DataFormat::CounterFact);
    assert!(
        text.contains(
            "record 1: field \"requested_rewrite.target_new.str\": expected a string, found number"
        ),
        "{text}"
    );
    let read = read_edits_lenient(&path, DataFormat::Auto).unwrap();
    assert_eq!(read.records.len(), 1);
    let errors: Vec<String> = read.errors.iter().map(|e| e.to_string()).collect();
    assert!(
        errors[1].starts_with("record 2: field \"requested_rewrite.prompt\": expected a \"{}\""),
        "{errors:#?}"
    );
    assert_eq!(
        errors[2],
        "record 3: duplicate id \"0\" (first at record 0)"
    );
}

#[test]
fn detection_handles_other_extensions_and_refuses_unknown_arrays() {
    let records = read_edits(&fixture("jsonl_with_json_extension.json"), DataFormat::Auto).unwrap();
    assert_eq!(records[0].id, "x1");
    let text = error_text(&fixture("unknown_array.json"), DataFormat::Auto);
    assert!(text.contains("cannot detect the dataset format"), "{text}");
    assert!(text.contains("question"), "lists the keys it saw: {text}");
    // Forcing the wrong format gives a field error, not a panic.
    let text = error_text(&fixture("zsre.json"), DataFormat::CounterFact);
    assert!(
        text.contains("record 0: field \"case_id\": missing"),
        "{text}"
    );
    let text = error_text(&fixture("edits.jsonl"), DataFormat::Zsre);
    assert!(text.contains("expected a JSON array"), "{text}");
    let text = error_text(&fixture("no_such_file.jsonl"), DataFormat::Auto);
    assert!(text.contains("no_such_file.jsonl"), "{text}");
}

#[test]
fn format_names_parse() {
    for (text, format) in [
        ("auto", DataFormat::Auto),
        ("JSONL", DataFormat::Jsonl),
        ("zsre", DataFormat::Zsre),
        ("counterfact", DataFormat::CounterFact),
    ] {
        assert_eq!(text.parse::<DataFormat>().unwrap(), format);
        assert_eq!(format.to_string().parse::<DataFormat>().unwrap(), format);
    }
    assert!("csv".parse::<DataFormat>().is_err());
}

#[test]
fn written_jsonl_reads_back_identically() {
    let mut records: Vec<EditRecord> =
        read_edits(&fixture("counterfact.json"), DataFormat::Auto).unwrap();
    records.extend(
        read_edits(&fixture("zsre.json"), DataFormat::Auto)
            .unwrap()
            .into_iter()
            .map(|mut r| {
                r.id = format!("zsre-{}", r.id);
                r
            }),
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("converted.jsonl");
    write_edits_jsonl(&out, &records).unwrap();
    assert_eq!(read_edits(&out, DataFormat::Auto).unwrap(), records);
}

#[test]
fn committed_geo_dataset_is_valid_and_well_formed() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/geo_facts.jsonl");
    let records = read_edits(&path, DataFormat::Auto).unwrap();
    assert!(records.len() >= 1000, "{} records", records.len());
    for record in &records {
        let true_answer = record
            .target_true
            .as_deref()
            .expect("geo records know the truth");
        assert_ne!(record.target_new, true_answer, "{}", record.id);
        assert!(record.rephrases.len() >= 2, "{}", record.id);
        assert!(record.locality.len() >= 5, "{}", record.id);
        assert!(
            record.target_new.split_whitespace().count() <= 2,
            "{}",
            record.id
        );
        assert!(
            !record.prompt.ends_with(' '),
            "{}: the engine adds the space",
            record.id
        );
    }
    // Locality probes are about held-out subjects: no edit of the stream ever rewrites one.
    let edited: std::collections::HashSet<&str> =
        records.iter().map(|r| r.prompt.as_str()).collect();
    for record in &records {
        for probe in &record.locality {
            assert!(
                !edited.contains(probe.prompt.as_str()),
                "{}: locality probe {:?} is an edit prompt",
                record.id,
                probe.prompt
            );
        }
    }
    // The first 100 records mix every relation.
    let relations: std::collections::BTreeSet<&str> = records[..100]
        .iter()
        .filter_map(|r| r.knowledge_id.split('/').next())
        .collect();
    assert_eq!(relations.len(), 4, "{relations:?}");
}
