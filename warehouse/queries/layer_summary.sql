-- Per layer: neurons, dead neurons, mean max activation and mean firing rate.
select layer, count(*) as neurons,
       count(*) filter (where max_activation <= 0) as dead,
       round(avg(max_activation), 3) as mean_max,
       round(avg(positive_frac), 3) as mean_positive_frac
from atlas.activation_records
group by layer order by layer;
