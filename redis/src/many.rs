//! Calls about many keys: pipelined in chunks of `redis.pipeline_keys` (and of bounded bytes
//! for reads), one pipeline per hash tag with `redis.cluster`, a few tags at a time.

use crate::keys::{byte_bounded, slot_groups, SLOTS_AT_ONCE};
use crate::{Redis, RedisError, Value};
use bytes::Bytes;
use std::future::Future;

impl Redis {
    /// Whether each of `keys` exists, in order, marking each used for Redis's LRU (`TOUCH`:
    /// `EXISTS` does not): one round trip per `redis.pipeline_keys`.
    pub async fn exists_many(&self, keys: &[String]) -> Result<Vec<bool>, RedisError> {
        self.each("TOUCH", keys).await
    }

    /// The values at `keys`, each if it is at most its bound (a larger one is not
    /// transferred: its length is asked first, in the same pipeline), in order: one round trip
    /// per `redis.pipeline_keys` (per hash tag with `redis.cluster`).
    pub async fn get_many(&self, keys: &[(String, u64)]) -> Result<Vec<Value>, RedisError> {
        self.per_slot(
            keys,
            |k| k.0.as_str(),
            |group| async move {
                let mut out = Vec::with_capacity(group.len());
                for chunk in byte_bounded(&group, self.chunk) {
                    let answers: Vec<(bool, u64, Vec<u8>)> = self
                        .run(|mut c| async move {
                            let mut pipe = redis::pipe();
                            for (k, max) in chunk {
                                // GETRANGE's end is inclusive; 1..0 is empty.
                                let (from, to) = match max {
                                    0 => (1, 0),
                                    m => (0, m.saturating_sub(1).min(i64::MAX as u64) as i64),
                                };
                                pipe.cmd("EXISTS").arg(k);
                                pipe.cmd("STRLEN").arg(k);
                                pipe.cmd("GETRANGE").arg(k).arg(from).arg(to);
                            }
                            let flat: Vec<redis::Value> = pipe.query_async(&mut c).await?;
                            flat.chunks(3)
                                .map(|t| match t {
                                    [e, l, v] => Ok((
                                        redis::from_redis_value(e)?,
                                        redis::from_redis_value(l)?,
                                        redis::from_redis_value(v)?,
                                    )),
                                    _ => Err(redis::RedisError::from((
                                        redis::ErrorKind::TypeError,
                                        "a short pipeline answer",
                                    ))),
                                })
                                .collect()
                        })
                        .await?;
                    out.extend(
                        chunk
                            .iter()
                            .zip(answers)
                            .map(|((_, max), (exists, len, data))| match (exists, len) {
                                (false, _) => Value::Missing,
                                (true, len) if len > *max => Value::TooLarge(len),
                                (true, _) => Value::Found(Bytes::from(data)),
                            }),
                    );
                }
                Ok(out)
            },
        )
        .await
    }

    /// `command KEY` for each of `keys`, pipelined in chunks (per hash tag with
    /// `redis.cluster`); the answers in order.
    async fn each<T: redis::FromRedisValue + Send>(
        &self,
        command: &str,
        keys: &[String],
    ) -> Result<Vec<T>, RedisError> {
        self.per_slot(
            keys,
            |k| k.as_str(),
            |group| async move {
                let mut out = Vec::with_capacity(group.len());
                for chunk in group.chunks(self.chunk) {
                    let answers: Vec<T> = self
                        .run(|mut c| async move {
                            let mut pipe = redis::pipe();
                            for k in chunk {
                                pipe.cmd(command).arg(k);
                            }
                            pipe.query_async(&mut c).await
                        })
                        .await?;
                    out.extend(answers);
                }
                Ok(out)
            },
        )
        .await
    }

    /// Runs `work` on the keys of each hash tag (all keys at once when not a Cluster), every
    /// group at the same time; the answers in the order of `keys`.
    async fn per_slot<'a, K: Clone, T, Fut>(
        &'a self,
        keys: &'a [K],
        name: impl Fn(&K) -> &str,
        work: impl Fn(Vec<K>) -> Fut,
    ) -> Result<Vec<T>, RedisError>
    where
        Fut: Future<Output = Result<Vec<T>, RedisError>>,
    {
        use futures::{StreamExt, TryStreamExt};
        let groups = slot_groups(keys, self.cluster.is_some(), name);
        // A few slots' pipelines at a time, each within its own bound.
        let group_keys: Vec<Vec<K>> = groups
            .iter()
            .map(|g| g.iter().map(|&i| keys[i].clone()).collect())
            .collect();
        let answers: Vec<Vec<T>> = futures::stream::iter(group_keys)
            .map(&work)
            .buffered(SLOTS_AT_ONCE)
            .try_collect()
            .await?;
        let mut out: Vec<Option<T>> = (0..keys.len()).map(|_| None).collect();
        for (group, answer) in groups.iter().zip(answers) {
            for (&i, v) in group.iter().zip(answer) {
                out[i] = Some(v);
            }
        }
        out.into_iter()
            .collect::<Option<Vec<T>>>()
            .ok_or_else(|| RedisError::Failed {
                at: self.at.clone(),
                message: "a short answer to a pipeline".into(),
            })
    }
}
