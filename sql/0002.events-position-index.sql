-- depends: 0001.initial
-- The rebuild catches up with `position > P` over all users. Positions grow with the
-- table's physical order, so a BRIN index finds them for almost nothing per insert.
CREATE INDEX events_position_brin ON events USING brin (position);
