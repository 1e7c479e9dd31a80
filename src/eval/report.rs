//! The evaluation's outputs: `eval.json` (everything measured), `eval.md` (the tables the
//! docs/evaluation.md quotes) and SVG plots (training loss curves, metric bars), written together
//! into one directory, all or nothing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;
use serde_json::Value;

use super::{
    Constraint, EvalError, GroupMetrics, Metrics, ModelResult, SteerResult, TypeSteerResult,
};

/// One line of the metrics table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    #[serde(flatten)]
    pub metrics: Metrics,
    /// What the row is, or why it differs (e.g. evaluated on all users).
    pub note: String,
}

/// Everything one `sidrec eval` run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub dataset: String,
    pub model: String,
    pub interactions: String,
    pub protocol: String,
    pub items: usize,
    /// Users in the data, and those evaluated (all, or a seeded sample).
    pub total_users: usize,
    pub users: usize,
    pub rows: Vec<Row>,
    pub sidrec: ModelResult,
    /// sidrec's metrics by whether the test transition occurs in training.
    pub by_transition: Vec<GroupMetrics>,
    pub constraints: Vec<Constraint>,
    pub steering: Vec<SteerResult>,
    /// Catalogs with several entity types only.
    pub type_steering: Vec<TypeSteerResult>,
    /// Held-out requests in words (`--requests FILE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<super::language::LanguageReport>,
    /// Things the reader must know (peers skipped, samples taken).
    pub notes: Vec<String>,
    pub seconds: f64,
    /// Per evaluated user, for error analysis (`rankings.jsonl`, one line each).
    #[serde(skip)]
    pub rankings: Vec<Ranking>,
}

/// One user's test case and the model's top-10, as catalog ids.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Ranking {
    pub user: String,
    pub target: String,
    /// 0-based rank of the target in `ranked`, if there.
    pub rank: Option<usize>,
    pub ranked: Vec<String>,
}

/// The protocol, in one sentence, for the report.
pub const PROTOCOL: &str = "leave-one-out per user (last item test, second to last \
validation, the rest training); ranking over the whole catalog, history not masked; \
Recall@k and NDCG@k with one relevant item";

impl Report {
    /// The tables, in Markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## {} ({} items, {} of {} users)\n",
            self.dataset, self.items, self.users, self.total_users
        );
        let _ = writeln!(s, "Protocol: {}. Model: `{}`.\n", self.protocol, self.model);
        let _ = writeln!(s, "| model | R@5 | R@10 | N@5 | N@10 | note |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for r in &self.rows {
            let m = &r.metrics;
            let _ = writeln!(
                s,
                "| {} | {:.4} | {:.4} | {:.4} | {:.4} | {} |",
                r.name, m.recall_5, m.recall_10, m.ndcg_5, m.ndcg_10, r.note
            );
        }
        let m = &self.sidrec;
        let _ = writeln!(
            s,
            "\nsidrec: {} beams; catalog-valid items {:.1}%; top-10 coverage {:.1}% of the \
             catalog; latency per user p50 {:.1} ms, p90 {:.1} ms, mean {:.1} ms{}.",
            m.beams,
            m.valid_share * 100.0,
            m.coverage_at_10 * 100.0,
            m.latency.p50_ms,
            m.latency.p90_ms,
            m.latency.mean_ms,
            m.exact_latency
                .as_ref()
                .map(|l| format!(" (exact ranking: p50 {:.1} ms)", l.p50_ms))
                .unwrap_or_default()
        );
        if !self.by_transition.is_empty() {
            let parts: Vec<String> = self
                .by_transition
                .iter()
                .map(|g| {
                    format!(
                        "{} ({:.1}% of users): R@10 {:.4}, N@10 {:.4}",
                        g.group,
                        g.share * 100.0,
                        g.metrics.recall_10,
                        g.metrics.ndcg_10
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "\nsidrec by the test transition (last history item → target) in training: {}.",
                parts.join("; ")
            );
        }
        if !self.steering.is_empty() {
            let rows = self.steering.iter().map(|r| {
                let shares = [r.base_rate, r.history_and_text, r.text_only, r.filter];
                (r.kind.clone(), r.requests, shares.to_vec())
            });
            table(
                &mut s,
                "**Steerability**: share of top-10 items with the stated attribute.",
                "| constraint | requests | history alone (base rate) | history + words | words alone (search) | filter |",
                rows,
            );
            let examples: Vec<String> = self
                .constraints
                .iter()
                .take(4)
                .map(|c| format!("\"{}\" (`{}`)", c.text, c.filter))
                .collect();
            let _ = writeln!(s, "\nConstraints such as {}.", examples.join(", "));
        }
        if !self.type_steering.is_empty() {
            let rows = self.type_steering.iter().map(|r| {
                let shares = [r.catalog_share, r.base_rate, r.text_only, r.with_limit];
                (r.item_type.clone(), r.requests, shares.to_vec())
            });
            table(
                &mut s,
                "**Type steering**: share of top-10 items of the requested type.",
                "| type | requests | share of catalog | history alone | asked in words | with --type |",
                rows,
            );
        }
        if let Some(l) = &self.language {
            let rows = l.words.iter().map(|r| {
                (
                    r.kind.clone(),
                    r.requests,
                    vec![r.catalog_rate, r.model, r.dense],
                )
            });
            table(
                &mut s,
                &format!(
                    "**Language steering**: held-out requests in words ({}), never seen in \
                     training; share of top-10 items that satisfy the request.",
                    l.file
                ),
                "| phrasing | requests | share of catalog | model alone | dense retrieval (same encoder) |",
                rows,
            );
            if let Some(h) = &l.history {
                let _ = writeln!(
                    s,
                    "\nHistory + words ({} users, one held-out request each): {:.1}% of top-10 \
                     satisfy it, {:.1}% from the history alone. Users whose next item \
                     satisfies a direct request ({}): N@10 {:.4} with its words, {:.4} without.",
                    h.users,
                    h.history_and_words * 100.0,
                    h.history_only * 100.0,
                    h.target_users,
                    h.ndcg_with,
                    h.ndcg_without
                );
            }
            if let Some(d) = l.describe.as_ref().filter(|d| d.named == 0) {
                let _ = writeln!(
                    s,
                    "\nProfiles (`describe`, {} users): no profile names a genre. E.g. \"{}\"",
                    d.users,
                    d.example.trim()
                );
            } else if let Some(d) = &l.describe {
                let _ = writeln!(
                    s,
                    "\nProfiles (`describe`, {} users): {:.1}% of the {} genres named are among \
                     the history's top 3; {:.1}% of profiles name a genre. E.g. \"{}\"",
                    d.users,
                    d.in_top3 * 100.0,
                    d.named,
                    d.with_genre * 100.0,
                    d.example.trim()
                );
            }
            if let Some(f) = &l.format {
                let rows = f.forms.iter().map(|r| {
                    let given = r
                        .given
                        .iter()
                        .map(|(k, n)| format!("{k} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    (
                        format!("{} ({given})", r.asked),
                        r.answers,
                        vec![r.right_form, r.items_satisfy],
                    )
                });
                table(
                    &mut s,
                    &format!(
                        "**Answer format from words** (chat, held-out format phrasings of {}): \
                         share of answers in the form asked for; share of the items named \
                         that satisfy the request.",
                        f.file
                    ),
                    "| asked (answers given) | requests | right form | items satisfy |",
                    rows,
                );
                let (n, real) = f.forms.iter().fold((0, 0), |(n, r), x| {
                    (n + x.titles_in_text, r + x.titles_real)
                });
                if n > 0 {
                    let _ = writeln!(
                        s,
                        "\nTitles written in words (`Title (year)`): {n}, of which {:.1}% are \
                         catalog items.",
                        real as f64 * 100.0 / n as f64
                    );
                }
                for (q, a) in &f.examples {
                    let _ = writeln!(s, "\n- \"{q}\" -> {a}");
                }
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "\n- {n}");
        }
        s
    }
}

/// A titled Markdown table of (name, requests, shares as percentages) rows.
fn table(
    s: &mut String,
    title: &str,
    header: &str,
    rows: impl Iterator<Item = (String, usize, Vec<f64>)>,
) {
    let _ = writeln!(s, "\n{title}\n\n{header}");
    let cols = header.matches('|').count().saturating_sub(1);
    let _ = writeln!(s, "{}|", "|---".repeat(cols));
    for (name, n, shares) in rows {
        let pct: Vec<String> = shares
            .iter()
            .map(|x| format!("{:.1}%", x * 100.0))
            .collect();
        let _ = writeln!(s, "| {name} | {n} | {} |", pct.join(" | "));
    }
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> EvalError {
    EvalError::Plot {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Bars of NDCG@10 and Recall@10 per row of the report.
pub fn plot_metrics(report: &Report, path: &Path) -> Result<(), EvalError> {
    let rows = &report.rows;
    let top = rows
        .iter()
        .map(|r| r.metrics.recall_10.max(r.metrics.ndcg_10))
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.15;
    let root = SVGBackend::new(path, (760, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: Recall@10 and NDCG@10", report.dataset),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..rows.len().max(1) as f64, 0f64..top)
        .map_err(|e| plot_err(path, e))?;
    let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len().max(1) * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.3}"))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    let series = [
        ("Recall@10", BLUE.mix(0.7), 0.1),
        ("NDCG@10", RED.mix(0.7), 0.5),
    ];
    for (label, color, offset) in series {
        let bars = rows.iter().enumerate().map(|(i, r)| {
            let v = if label == "Recall@10" {
                r.metrics.recall_10
            } else {
                r.metrics.ndcg_10
            };
            let x0 = i as f64 + offset;
            Rectangle::new([(x0, 0.0), (x0 + 0.38, v)], color.filled())
        });
        chart
            .draw_series(bars)
            .map_err(|e| plot_err(path, e))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))
}

/// Training and validation loss per stage, from a model's `train_report.json`; `Ok(false)`
/// when the report has no curve to draw.
pub fn plot_losses(train_report: &Value, path: &Path) -> Result<bool, EvalError> {
    // (stage, train points, validation points), steps numbered across stages.
    type Points = Vec<(f64, f64)>;
    let mut curves: Vec<(String, Points, Points)> = Vec::new();
    let mut offset = 0.0;
    for stage in train_report
        .get("stages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = stage
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("stage")
            .to_string();
        let train: Vec<(f64, f64)> = stage
            .get("train_loss")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| Some((offset + p.get("step")?.as_f64()?, p.get("loss")?.as_f64()?)))
            .collect();
        let valid: Vec<(f64, f64)> = stage
            .get("valid_loss")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| Some((offset + p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
            .collect();
        offset += train.last().map_or(0.0, |p| p.0 - offset);
        if !train.is_empty() {
            curves.push((name, smooth(&train, 25), valid));
        }
    }
    if curves.is_empty() {
        return Ok(false);
    }
    let pts = curves.iter().flat_map(|c| c.1.iter().chain(&c.2));
    let (mut x1, mut y0, mut y1) = (1.0f64, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let root = SVGBackend::new(path, (760, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "training loss (smoothed) and validation loss",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..x1, (y0 * 0.95)..(y1 * 1.02))
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()
        .map_err(|e| plot_err(path, e))?;
    for (i, (name, train, valid)) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                train.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| plot_err(path, e))?
            .label(format!("{name}: train"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        if !valid.is_empty() {
            chart
                .draw_series(valid.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| plot_err(path, e))?
                .label(format!("{name}: validation"))
                .legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(true)
}

/// Moving average over `w` points (the per-step loss is noisy).
fn smooth(points: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    let w = w.max(1);
    let mut sum = 0.0;
    let mut out = Vec::with_capacity(points.len());
    for (i, &(x, y)) in points.iter().enumerate() {
        sum += y;
        if i >= w {
            sum -= points[i - w].1;
        }
        out.push((x, sum / (i + 1).min(w) as f64));
    }
    out
}

/// Writes `eval.json`, `eval.md`, `metrics.svg`, (with a training report) `loss.svg` and
/// (with rankings) `rankings.jsonl` into `out`, all or nothing; returns the files written.
pub fn write(
    report: &Report,
    train_report: Option<&Value>,
    out: &Path,
    overwrite: bool,
    inputs: &[&Path],
) -> Result<Vec<PathBuf>, EvalError> {
    let mut names = Vec::new();
    crate::atomic::write_dir(
        out,
        overwrite,
        inputs,
        EvalError::Refused,
        |p, e| EvalError::Io {
            path: p.to_path_buf(),
            source: e,
        },
        |dir| {
            let io = |p: &Path| {
                let p = p.to_path_buf();
                move |e| EvalError::Io { path: p, source: e }
            };
            let json = serde_json::to_string_pretty(report).expect("report serialises");
            let p = dir.join("eval.json");
            std::fs::write(&p, json + "\n").map_err(io(&out.join("eval.json")))?;
            names.push("eval.json");
            std::fs::write(dir.join("eval.md"), report.markdown())
                .map_err(io(&out.join("eval.md")))?;
            names.push("eval.md");
            plot_metrics(report, &dir.join("metrics.svg"))?;
            names.push("metrics.svg");
            if let Some(tr) = train_report {
                if plot_losses(tr, &dir.join("loss.svg"))? {
                    names.push("loss.svg");
                }
            }
            if !report.rankings.is_empty() {
                let mut text = String::new();
                for r in &report.rankings {
                    text += &serde_json::to_string(r).expect("ranking serialises");
                    text.push('\n');
                }
                std::fs::write(dir.join("rankings.jsonl"), text)
                    .map_err(io(&out.join("rankings.jsonl")))?;
                names.push("rankings.jsonl");
            }
            Ok(())
        },
    )?;
    Ok(names.into_iter().map(|n| out.join(n)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_a_running_mean() {
        let p = [(1.0, 4.0), (2.0, 2.0), (3.0, 0.0)];
        assert_eq!(smooth(&p, 2), vec![(1.0, 4.0), (2.0, 3.0), (3.0, 1.0)]);
    }

    #[test]
    fn loss_plot_needs_a_curve() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.svg");
        assert!(!plot_losses(&serde_json::json!({"stages": []}), &p).unwrap());
        let tr = serde_json::json!({"stages": [
            {"name": "align", "train_loss": [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}],
             "valid_loss": [[2, 4.5]]},
            {"name": "instruct", "train_loss": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}],
             "valid_loss": []}
        ]});
        assert!(plot_losses(&tr, &p).unwrap());
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("instruct: train"));
    }
}
