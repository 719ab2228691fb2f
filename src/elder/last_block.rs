//! The trainer's last block, run only where it is read.
//!
//! Above the experts every block's input gradient is needed, but of the last block's output the
//! head reads only the target rows. The rows before a sequence's first target row are needed there
//! only for their keys and values (the target rows attend to them), and the rows after its last
//! target row not at all. For a batch of full sequences that is most rows: a geo edit's three
//! sequences are about 42 rows, of which about 9 are target rows.

use crate::model::transformer::sequence_rows;
use crate::model::BatchShape;

/// A full batch's rows split for its last block: each sequence's `context` (rows `0..from[b]`,
/// keys and values only) and `answer` (its target rows `from[b]..=last target`, the whole block).
#[derive(Debug, Clone, PartialEq)]
pub struct LastBlockRows {
    pub context: BatchShape,
    pub answer: BatchShape,
    /// The target rows in the answer's layout (`[answer.batch * answer.seq]`), in the batch's order.
    pub target_rows: Vec<usize>,
    /// The padded length of the full batch the split was made from.
    full_seq: usize,
}

impl LastBlockRows {
    /// The split of `shape` (a batch of whole sequences: every `start` 0) whose LM head reads
    /// `target_rows` (indices into `[shape.batch * shape.seq]`). `None` when the batch is not of
    /// whole sequences or the answer would be as large as the batch.
    pub fn new(shape: &BatchShape, target_rows: &[usize]) -> Option<Self> {
        if shape.start.iter().any(|&s| s != 0) || shape.seq == 0 {
            return None;
        }
        let seq = shape.seq;
        // Each sequence's first and one-past-last target offset (none: an empty answer at its end).
        let mut span: Vec<(usize, usize)> = shape.valid.iter().map(|&v| (v, v)).collect();
        let mut seen = vec![false; shape.batch];
        for &r in target_rows {
            let (b, i) = (r / seq, r % seq);
            let s = &mut span[b];
            if seen[b] {
                *s = (s.0.min(i), s.1.max(i + 1));
            } else {
                *s = (i, i + 1);
                seen[b] = true;
            }
        }
        let from: Vec<usize> = span.iter().map(|s| s.0).collect();
        let answer_valid: Vec<usize> = span.iter().map(|s| s.1 - s.0).collect();
        let context = BatchShape {
            batch: shape.batch,
            seq: from.iter().copied().max().unwrap_or(0).max(1),
            valid: from.clone(),
            start: vec![0; shape.batch],
        };
        let answer = BatchShape {
            batch: shape.batch,
            seq: answer_valid.iter().copied().max().unwrap_or(0).max(1),
            valid: answer_valid,
            start: from,
        };
        // The context's rows cost only their keys and values (about 6% of a row's work in
        // SmolLM2's block), so the split pays whenever the answer is smaller than the batch.
        if answer.rows() >= shape.rows() {
            return None;
        }
        let target_rows = target_rows
            .iter()
            .map(|&r| (r / seq) * answer.seq + (r % seq - answer.start[r / seq]))
            .collect();
        Some(LastBlockRows {
            context,
            answer,
            target_rows,
            full_seq: seq,
        })
    }

    /// The context's rows of `h` (`[full rows, d]`) in the context's layout.
    pub fn gather_context(&self, h: &[f32], d: usize) -> Vec<f32> {
        sequence_rows(h, &self.context, self.full_seq, d)
    }

    /// The answer's rows of `h` in the answer's layout.
    pub fn gather_answer(&self, h: &[f32], d: usize) -> Vec<f32> {
        sequence_rows(h, &self.answer, self.full_seq, d)
    }

    /// The full batch's gradient (`[full rows, d]`) from the context's and the answer's: rows in
    /// neither get zero.
    pub fn scatter(&self, context: &[f32], answer: &[f32], d: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; self.context.batch * self.full_seq * d];
        for b in 0..self.context.batch {
            let row = b * self.full_seq;
            let n = self.context.valid[b] * d;
            out[row * d..][..n].copy_from_slice(&context[b * self.context.seq * d..][..n]);
            let (at, n) = (row + self.answer.start[b], self.answer.valid[b] * d);
            out[at * d..][..n].copy_from_slice(&answer[b * self.answer.seq * d..][..n]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(valid: &[usize], seq: usize) -> BatchShape {
        BatchShape {
            batch: valid.len(),
            seq,
            valid: valid.to_vec(),
            start: vec![0; valid.len()],
        }
    }

    #[test]
    fn splits_each_sequence_at_its_targets() {
        // Sequence 0: 6 rows, targets at 3 and 4; sequence 1: 4 rows, target at 2.
        let s = shape(&[6, 4], 6);
        let split = LastBlockRows::new(&s, &[3, 4, 6 + 2]).unwrap();
        assert_eq!(split.context.valid, vec![3, 2]);
        assert_eq!(split.context.seq, 3);
        assert_eq!(split.answer.valid, vec![2, 1]);
        assert_eq!(split.answer.start, vec![3, 2]);
        assert_eq!(split.answer.seq, 2);
        assert_eq!(split.target_rows, vec![0, 1, 2]);

        let d = 2;
        let h: Vec<f32> = (0..s.rows() * d).map(|x| x as f32).collect();
        let context = split.gather_context(&h, d);
        let answer = split.gather_answer(&h, d);
        // Row 1 of sequence 1 is full row 7; the answer's first row of sequence 1 is full row 8.
        assert_eq!(&context[(3 + 1) * d..][..d], &h[7 * d..][..d]);
        assert_eq!(&answer[2 * d..][..d], &h[8 * d..][..d]);
        let back = split.scatter(&context, &answer, d);
        for row in 0..s.rows() {
            let (b, i) = (row / 6, row % 6);
            let kept = i < [5, 3][b];
            let expect = if kept {
                &h[row * d..][..d]
            } else {
                &[0.0, 0.0][..]
            };
            assert_eq!(&back[row * d..][..d], expect, "row {row}");
        }
    }

    #[test]
    fn no_split_for_windows_or_when_nothing_is_saved() {
        let mut s = shape(&[3], 3);
        assert!(LastBlockRows::new(&s, &[0, 1, 2]).is_none());
        // Padding: the answer's longest sequence sets its length.
        let s2 = shape(&[2, 2], 2);
        assert!(LastBlockRows::new(&s2, &[0, 1, 3]).is_none());
        s.start = vec![4];
        assert!(LastBlockRows::new(&s, &[1]).is_none());
    }
}
