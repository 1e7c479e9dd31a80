//! The transition memory on hand-computed cases: counting, asking, its file.

use sidrec::catalog::{Catalog, Item};
use sidrec::memory::{MemoryError, MemorySettings, TransitionMemory};

fn catalog(n: usize) -> Catalog {
    let items = (0..n)
        .map(|i| Item {
            id: format!("i{i}"),
            item_type: "product".into(),
            title: format!("item {i}"),
            description: String::new(),
            attrs: Default::default(),
        })
        .collect();
    Catalog::from_items(items).unwrap()
}

fn close(got: &[(u32, f32)], want: &[(u32, f32)]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.0, w.0, "{got:?} vs {want:?}");
        assert!((g.1 - w.1).abs() < 1e-6, "{got:?} vs {want:?}");
    }
}

#[test]
fn successors_count_at_one_over_distance_within_the_window() {
    let settings = MemorySettings {
        window: 2,
        recent: 2,
        decay: 0.5,
    };
    // 0 → 1 (d 1), 0 → 2 (d 2), 1 → 2, 1 → 3, 2 → 3; then 0 → 2 (d 1).
    let m = TransitionMemory::build(5, &[vec![0, 1, 2, 3], vec![0, 2]], settings).unwrap();
    // Item 0: 1 at 1, 2 at 1/2 + 1 = 1.5: normalised 0.4 and 0.6.
    close(m.successors(0), &[(1, 0.4), (2, 0.6)]);
    // Item 1: 2 at 1, 3 at 0.5.
    close(m.successors(1), &[(2, 2.0 / 3.0), (3, 1.0 / 3.0)]);
    close(m.successors(2), &[(3, 1.0)]);
    assert!(m.successors(3).is_empty() && m.successors(4).is_empty());

    // History [.., 0, 1]: the last item (1) at weight 1, item 0 at 0.5; older ones not.
    // 1: 0.5·0.4 = 0.2; 2: 2/3 + 0.5·0.6 = 0.9667; 3: 1/3. Total 1.5.
    let d = m.distribution(&[3, 0, 1]);
    close(
        &d,
        &[
            (1, 0.2 / 1.5),
            (2, (2.0 / 3.0 + 0.3) / 1.5),
            (3, (1.0 / 3.0) / 1.5),
        ],
    );
    let sum: f32 = d.iter().map(|x| x.1).sum();
    assert!((sum - 1.0).abs() < 1e-6);
    // Items never followed by anything: nothing to say.
    assert!(m.distribution(&[4, 3]).is_empty());
    assert!(m.distribution(&[]).is_empty());
}

#[test]
fn settings_and_indices_are_checked() {
    let bad = [
        MemorySettings {
            window: 0,
            ..Default::default()
        },
        MemorySettings {
            recent: 0,
            ..Default::default()
        },
        MemorySettings {
            decay: 0.0,
            ..Default::default()
        },
        MemorySettings {
            decay: f32::NAN,
            ..Default::default()
        },
    ];
    for s in bad {
        assert!(matches!(
            TransitionMemory::build(3, &[vec![0, 1]], s),
            Err(MemoryError::Settings(_))
        ));
    }
    let e = TransitionMemory::build(3, &[vec![0, 7]], MemorySettings::default()).unwrap_err();
    assert!(e.to_string().contains("index 7"), "{e}");
}

#[test]
fn the_file_round_trips_and_names_what_is_wrong() {
    let cat = catalog(4);
    let m = TransitionMemory::build(
        4,
        &[vec![0, 1, 2], vec![2, 0, 3]],
        MemorySettings::default(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("transitions.json");
    m.save(&path, &cat).unwrap();
    assert_eq!(TransitionMemory::load(&path, &cat).unwrap(), m);

    // Another catalog without item i3: the unknown id is named.
    let e = TransitionMemory::load(&path, &catalog(3)).unwrap_err();
    assert!(
        matches!(&e, MemoryError::UnknownItem { id, .. } if id == "i3"),
        "{e}"
    );
    // Not JSON, and a negative weight: the file is named.
    std::fs::write(&path, "{").unwrap();
    let e = TransitionMemory::load(&path, &cat).unwrap_err().to_string();
    assert!(
        e.contains("transitions.json") && e.contains("not a transition memory"),
        "{e}"
    );
    std::fs::write(
        &path,
        r#"{"settings":{"window":3,"recent":5,"decay":0.3},"successors":{"i0":[["i1",-1.0]]}}"#,
    )
    .unwrap();
    let e = TransitionMemory::load(&path, &cat).unwrap_err().to_string();
    assert!(e.contains("weight -1"), "{e}");
    let e = TransitionMemory::load(&dir.path().join("missing.json"), &cat).unwrap_err();
    assert!(matches!(e, MemoryError::Io { .. }));
}
